// imgsearch web gateway: the page. Plain JS, no build step, nothing from elsewhere; it uses only the
// JSON API under /api/. Every id, label and message goes into the page as text (textContent, or a
// property such as img.alt), never as markup.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KS = [5, 10, 20, 50, 100];
  const HEALTH_EVERY_MS = 15000;

  const state = {
    config: { max_upload_bytes: 8 * 1024 * 1024, max_k: 100, default_k: 10, thumbnails: true, indexing: false },
    last: null, // what to run again when k changes: {kind: "upload", blob, name} or {kind: "id", id}
    queryView: null, // the current query's {input, reconstruction}
    items: new Map(), // id -> promise of /api/items (the model's view of a result), per result list
    selected: null,
    collections: null, // /api/collections: {default, collections, aliases}, once loaded
    answered: "", // the collection the shown results came from (an alias resolved): their items' views
    hint: "", // the results' first hint, shown again when the collection changes
    labels: [], // the label filter: search only items with one of these labels; none: any label
    available: null, // /api/labels of the picked collection: the labels to choose from
  };

  class ApiError extends Error {
    constructor(status, detail, service) {
      super(detail);
      this.status = status;
      this.service = service || null;
    }
  }

  // The read token (a gateway started with --read-token): a 401 marked auth "read-token" shows the token
  // form; the token goes into a cookie, which every later request carries, thumbnails' <img src> too,
  // and the request runs again. One form for all the requests waiting on it.
  const READ_TOKEN_COOKIE = "imgsearch_read_token";
  const readToken = { waiting: null, resolve: null };

  function askForReadToken(detail) {
    $("token-note").textContent = detail;
    $("token-form").hidden = false;
    $("token-input").focus();
    if (!readToken.waiting) {
      readToken.waiting = new Promise((resolve) => {
        readToken.resolve = resolve;
      });
    }
    return readToken.waiting;
  }

  function setUpReadToken() {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (!token || !readToken.resolve) return;
      const secure = window.location.protocol === "https:" ? "; Secure" : "";
      document.cookie =
        `${READ_TOKEN_COOKIE}=${encodeURIComponent(token)}; path=/; SameSite=Strict${secure}`;
      $("token-input").value = "";
      $("token-form").hidden = true;
      const resolve = readToken.resolve;
      readToken.waiting = null;
      readToken.resolve = null;
      resolve();
    });
  }

  // fetch, asking for the read token (and trying again) for as long as the gateway says it is missing
  // or wrong; throws what fetch throws.
  async function authorizedFetch(path, options) {
    for (;;) {
      const response = await fetch(path, options);
      if (response.status !== 401) return response;
      const body = await response.clone().json().catch(() => null);
      if (!body || body.auth !== "read-token") return response;
      await askForReadToken(body.detail);
    }
  }

  async function api(path, options) {
    let response;
    try {
      response = await authorizedFetch(path, options);
    } catch (error) {
      throw new ApiError(0, `the gateway is not reachable (${error.message})`);
    }
    const type = response.headers.get("content-type") || "";
    const body = type.includes("application/json") ? await response.json().catch(() => null) : null;
    if (!response.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : `HTTP ${response.status}`;
      throw new ApiError(response.status, detail, body && body.service);
    }
    return body;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function showStatus(text, kind = "error") {
    const box = $("status");
    box.textContent = text || "";
    box.className = `status ${kind}`;
    box.hidden = !text;
  }

  function setBusy(busy) {
    $("busy").hidden = !busy;
  }

  function bytes(count) {
    if (count >= 1024 * 1024) return `${(count / 1024 / 1024).toFixed(1)} MiB`;
    if (count >= 1024) return `${(count / 1024).toFixed(0)} KiB`;
    return `${count} bytes`;
  }

  function setImage(img, url) {
    if (url) {
      img.src = url;
      img.hidden = false;
    } else {
      img.removeAttribute("src");
      img.hidden = true;
    }
  }

  // Collection stats and the services' health: a clear message when one is down.
  async function refreshStatus() {
    let health = null;
    try {
      const response = await authorizedFetch("/api/health");
      health = await response.json();
    } catch (error) {
      showStatus(`The web gateway is not reachable (${error.message}).`);
      $("stats").textContent = "";
      return false;
    }
    const down = ["encoder", "index"].filter((name) => health[name] && !health[name].ok);
    if (down.length) {
      const details = down.map((name) => health[name].detail).join("; ");
      showStatus(`Service down: ${details}. Searches fail until it is back.`);
    } else if ($("status").classList.contains("error")) {
      showStatus("");
    }
    if (health.index && health.index.ok) {
      if (!state.collections) await loadCollections(); // the index was down when the page opened
      if (!state.available) loadLabels();
      const collection = picked();
      try {
        const stats = await api(inCollection("/api/stats", collection));
        if (picked() !== collection) return !down.length; // another one was picked meanwhile
        if (state.collections) $("collection-note").textContent = "";
        const version = stats.model_version ? stats.model_version.slice(0, 12) : "–";
        const model = stats.model_name ? `${stats.model_name} ${version}` : version;
        $("stats").textContent =
          `${stats.collection} · ${plural(stats.count, "image", "images")} · ${stats.dim}-d · model ${model}`;
        $("stats").title =
          `collection ${stats.collection}, model ${stats.model_name || "the encoder's default"}, ` +
          `model version ${stats.model_version || "none yet"}`;
      } catch (error) {
        $("stats").textContent = "";
        if (error.status === 400 || error.status === 404) $("collection-note").textContent = error.message;
      }
    } else {
      $("stats").textContent = "collection unavailable";
    }
    return !down.length;
  }

  function handleError(error) {
    showStatus(error.message);
    if (error.status === 503 || error.status === 0) refreshStatus().then(() => {
      // keep the call's own message when health finds nothing wrong (a blip)
      if ($("status").hidden) showStatus(error.message);
    });
  }

  function k() {
    return Number($("k").value) || state.config.default_k;
  }

  // The collection: picked in #collection, kept in the address (?collection=NAME) so that a link keeps
  // it. "" is the gateway's default (--collection); the gateway says whether a name exists.
  const COLLECTION_PARAM = "collection";

  function picked() {
    return $("collection").value || "";
  }

  function inCollection(path, collection) {
    if (!collection) return path;
    return `${path}${path.includes("?") ? "&" : "?"}collection=${encodeURIComponent(collection)}`;
  }

  function addressCollection() {
    return new URLSearchParams(window.location.search).get(COLLECTION_PARAM) || "";
  }

  // The label filter, kept in the address as the collection is (?label=3&label=5, one per label).
  const LABEL_PARAM = "label";

  function addressLabels() {
    return [...new Set(new URLSearchParams(window.location.search).getAll(LABEL_PARAM).filter(Boolean))];
  }

  function keepInAddress() {
    const url = new URL(window.location.href);
    const collection = picked();
    if (collection) url.searchParams.set(COLLECTION_PARAM, collection);
    else url.searchParams.delete(COLLECTION_PARAM);
    url.searchParams.delete(LABEL_PARAM);
    for (const label of state.labels) url.searchParams.append(LABEL_PARAM, label);
    window.history.replaceState(null, "", url.href);
  }

  // What a search was asked with, to tell whether its reply is still the one wanted.
  function filterKey() {
    return JSON.stringify(state.labels);
  }

  function withLabels(path) {
    let found = path;
    for (const label of state.labels) {
      found += `${found.includes("?") ? "&" : "?"}${LABEL_PARAM}=${encodeURIComponent(label)}`;
    }
    return found;
  }

  function plural(count, one, many) {
    return `${count.toLocaleString()} ${count === 1 ? one : many}`;
  }

  function option(value, text, title) {
    const node = el("option", "", text);
    node.value = value;
    if (title) node.title = title;
    return node;
  }

  // The picker: every collection (name, model, count) and every alias ("live → clothes-v2"), the one in
  // the address chosen, else the gateway's default. A name in the address that the index does not know
  // stays chosen, so its searches say so.
  function fillCollections(found, wanted) {
    const select = $("collection");
    const groups = [];
    const names = new Set();
    if (found) {
      const collections = el("optgroup");
      collections.label = "Collections";
      for (const c of found.collections) {
        const model = c.model_name || "default model";
        const text = `${c.name} (${model}, ${plural(c.count, "image", "images")})`;
        collections.append(option(c.name, text, `collection ${c.name}`));
        names.add(c.name);
      }
      groups.push(collections);
      const aliases = Object.entries(found.aliases);
      if (aliases.length) {
        const group = el("optgroup");
        group.label = "Aliases";
        for (const [alias, target] of aliases) {
          group.append(option(alias, `${alias} → ${target}`, `alias ${alias} of the collection ${target}`));
          names.add(alias);
        }
        groups.push(group);
      }
    }
    const chosen = wanted || (found ? found.default : "");
    if (!names.has(chosen)) {
      const text = chosen || "the gateway's default";
      const unlisted = found ? `${text} (not listed)` : text;
      groups.unshift(option(chosen, unlisted, "not among the index's collections"));
    }
    select.replaceChildren(...groups);
    select.value = chosen;
  }

  async function loadCollections() {
    const wanted = picked() || addressCollection();
    try {
      state.collections = await api("/api/collections");
      $("collection-note").textContent = "";
    } catch (error) {
      $("collection-note").textContent = `collections unavailable: ${error.message}`;
    }
    fillCollections(state.collections, wanted);
  }

  function showAnswered(reply) {
    state.answered = reply.collection;
    const through = picked() && picked() !== reply.collection ? ` (through ${picked()})` : "";
    const model = reply.model ? ` · model ${reply.model}` : "";
    const box = $("results-collection");
    box.textContent = `answered by the collection ${reply.collection}${through}${model}`;
    box.hidden = false;
  }

  function clearResults() {
    state.last = null;
    state.answered = "";
    renderResults([], "Results", state.hint);
    $("results-collection").hidden = true;
    $("results-filter").hidden = true;
    $("results-notice").hidden = true;
    $("query-panel").hidden = true;
    showNovelty(null);
  }

  function setUpCollections() {
    $("collection").addEventListener("change", () => {
      keepInAddress();
      const last = state.last;
      if (last && last.kind === "upload") rerun();
      else clearResults(); // an id belongs to its collection
      refreshStatus();
      loadLabels();
    });
  }

  // The label filter: a chip per label of the picked collection (GET /api/labels: a sample of its first
  // items), pressed when chosen, and a field for a label the sample missed. Chosen labels stay chosen
  // when the collection changes; a chosen label that the collection lacks still shows, to be removed.
  async function loadLabels() {
    const collection = picked();
    try {
      const found = await api(inCollection("/api/labels", collection));
      if (picked() !== collection) return; // another one was picked meanwhile
      state.available = found;
    } catch (error) {
      if (picked() !== collection) return;
      state.available = null;
      $("labels-note").textContent = `labels unavailable: ${error.message}`;
      renderLabelChips();
      return;
    }
    $("labels-note").textContent = labelsNote(state.available);
    renderLabelChips();
  }

  function labelsNote(found) {
    const first = `the first ${plural(found.sampled, "image", "images")} of ${found.count.toLocaleString()}`;
    if (!found.labels.length) {
      if (!found.count) return "";
      return found.complete ? "no labels stored" : `no labels among ${first}`;
    }
    const parts = [];
    if (!found.complete) parts.push(`labels of ${first}`);
    if (found.distinct > found.labels.length) parts.push(`the ${found.labels.length} most common`);
    if (parts.length) parts.push("type another to filter by it");
    return parts.join("; ");
  }

  function renderLabelChips() {
    const offered = state.available ? state.available.labels : [];
    const shown = [...offered, ...state.labels.filter((label) => !offered.includes(label))];
    $("label-chips").replaceChildren(
      ...shown.map((label) => {
        const chosen = state.labels.includes(label);
        const chip = el("button", chosen ? "chip chosen" : "chip", label);
        chip.type = "button";
        chip.setAttribute("aria-pressed", chosen ? "true" : "false");
        chip.title = chosen ? `label ${label}: chosen (click to remove)` : `search only the label ${label}`;
        chip.addEventListener("click", () =>
          setLabels(chosen ? state.labels.filter((l) => l !== label) : [...state.labels, label])
        );
        return chip;
      })
    );
    $("label-clear").disabled = !state.labels.length;
  }

  function setLabels(labels) {
    state.labels = [...new Set(labels.filter(Boolean))];
    keepInAddress();
    renderLabelChips();
    rerun();
  }

  function setUpLabels() {
    $("label-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const label = $("label-input").value.trim();
      $("label-input").value = "";
      if (label && !state.labels.includes(label)) setLabels([...state.labels, label]);
    });
    $("label-clear").addEventListener("click", () => setLabels([]));
    renderLabelChips();
  }

  // The filter a reply was answered with (its `filter`: conditions, ANDed), in words.
  const OPS = {
    equals: "is",
    not_equals: "is not",
    any_of: "is one of",
    none_of: "is none of",
    prefix: "starts with",
  };

  function describeCondition(c) {
    if (c.op === "exists") return `${c.key} is set`;
    const one = (c.op === "any_of" || c.op === "equals") && c.values.length === 1;
    if (one) return `${c.key} is ${c.values[0]}`;
    return `${c.key} ${OPS[c.op] || c.op} ${c.values.join(", ")}`;
  }

  function showFilterAndNotice(reply) {
    const filter = $("results-filter");
    const conditions = Array.isArray(reply.filter) ? reply.filter : [];
    const described = conditions.map(describeCondition).join(" and ");
    filter.textContent = conditions.length ? `filtered: ${described}` : "";
    filter.hidden = !conditions.length;
    const notice = $("results-notice");
    notice.textContent = reply.nothing_close && reply.notice ? reply.notice : "";
    notice.hidden = !notice.textContent;
  }

  // The query's novelty (the encoder's: how unlike the model's training data it looks): a notice on the
  // query when above 1. reply null: none.
  function showNovelty(reply) {
    const notice = $("query-novelty");
    notice.textContent = reply && reply.novel && reply.novelty_notice ? reply.novelty_notice : "";
    notice.hidden = !notice.textContent;
  }

  const NOVEL_ABOVE = 1;

  function isNovel(result) {
    return typeof result.novelty === "number" && result.novelty > NOVEL_ABOVE;
  }

  // Results: a grid of thumbnails with id, label and distance; a badge on those unlike the training data.
  function card(result, rank) {
    const item = el("li", "card");
    const open = el("button", "open");
    open.type = "button";
    open.title = "More like this";
    open.setAttribute("aria-label", `More like ${result.id}`);
    const url = result.thumbnail_url;
    if (typeof url === "string" && url.startsWith("/api/thumbnail?")) {
      const img = el("img", "thumb");
      img.alt = result.id;
      img.loading = "lazy";
      img.src = url;
      img.addEventListener("error", () => img.replaceWith(el("span", "thumb placeholder", "no image")));
      open.append(img);
    } else {
      open.append(el("span", "thumb placeholder", "no image"));
    }
    if (isNovel(result)) {
      const badge = el("span", "novel-badge", "unlike training data");
      badge.title =
        `novelty ${result.novelty.toFixed(1)}: this image looks unlike what the model was trained on`;
      open.append(badge);
    }
    open.addEventListener("click", () => searchById(result.id, state.answered));

    // One line each, cut with an ellipsis (style.css), the whole text in the tooltip: a long label or id
    // never runs into the distance, nor makes its card taller than the others.
    const meta = el("div", "meta");
    const label = result.metadata && result.metadata.label !== undefined ? result.metadata.label : "–";
    const labelBox = el("span", "label", label);
    labelBox.title = `label ${label}`;
    meta.append(labelBox, el("span", "distance", result.distance.toFixed(3)));
    meta.title = `rank ${rank}, label, distance`;
    const idBox = el("div", "id", result.id);
    idBox.title = result.id;

    const why = el("button", "why", "why?");
    why.type = "button";
    why.addEventListener("click", () => showDetail(result, item));
    item.addEventListener("mouseenter", () => showDetail(result, item));
    item.append(open, meta, idBox, why);
    return item;
  }

  function renderResults(results, title, emptyText) {
    state.items = new Map();
    $("detail").hidden = true;
    $("results-title").textContent = title;
    const list = $("results");
    list.replaceChildren(...results.map((result, n) => card(result, n + 1)));
    $("results-hint").hidden = results.length > 0;
    if (!results.length) $("results-hint").textContent = emptyText;
  }

  function itemView(id) {
    if (!state.items.has(id)) {
      const pending = api(inCollection(`/api/items?id=${encodeURIComponent(id)}`, state.answered));
      pending.catch(() => state.items.delete(id));
      state.items.set(id, pending);
    }
    return state.items.get(id);
  }

  // Why a result matched: its model input and reconstruction, shown beside the query's.
  async function showDetail(result, node) {
    if (state.selected) state.selected.classList.remove("selected");
    state.selected = node;
    node.classList.add("selected");
    const panel = $("detail");
    panel.hidden = false;
    $("detail-id").textContent = result.id;
    const label = result.metadata && result.metadata.label !== undefined ? result.metadata.label : "–";
    const novelty = typeof result.novelty === "number" ? ` · novelty ${result.novelty.toFixed(2)}` : "";
    $("detail-meta").textContent =
      `label ${label} · distance ${result.distance.toFixed(4)} to the query${novelty}`;
    setImage($("detail-input"), null);
    setImage($("detail-reconstruction"), null);
    $("detail-note").textContent = "loading…";
    try {
      const item = await itemView(result.id);
      if ($("detail-id").textContent !== result.id) return; // another result was picked meanwhile
      setImage($("detail-input"), item.view.input);
      setImage($("detail-reconstruction"), item.view.reconstruction);
      $("detail-note").textContent = item.view.note || "";
    } catch (error) {
      $("detail-note").textContent = error.message;
    }
  }

  function showQuery(title, original, view) {
    state.queryView = view;
    $("query-panel").hidden = false;
    $("query-title").textContent = title;
    setImage($("query-original"), original);
    setImage($("query-input"), view ? view.input : null);
    setImage($("query-reconstruction"), view ? view.reconstruction : null);
    $("query-note").textContent = view && view.note ? view.note : "";
  }

  // Search by an image: an upload, a dropped file or the drawing (a PNG).
  async function searchUpload(blob, name, preview) {
    if (blob.size > state.config.max_upload_bytes) {
      showStatus(
        `${name} is ${bytes(blob.size)}, over the upload limit of ${bytes(state.config.max_upload_bytes)}.`
      );
      return;
    }
    state.last = { kind: "upload", blob, name, preview };
    const collection = picked();
    const filtered = filterKey();
    const form = new FormData();
    form.append("file", blob, name);
    form.append("k", String(k()));
    if (collection) form.append("collection", collection);
    for (const label of state.labels) form.append(LABEL_PARAM, label);
    setBusy(true);
    try {
      const reply = await api("/api/search", { method: "POST", body: form });
      // another collection or filter was picked meanwhile: its search runs
      if (picked() !== collection || filterKey() !== filtered) return;
      if ($("status").classList.contains("error")) showStatus("");
      showQuery(name === "drawing.png" ? "Your drawing" : "Your image", preview, reply.query);
      showNovelty(reply);
      showAnswered(reply);
      showFilterAndNotice(reply);
      const empty = state.labels.length
        ? "No results: no image has those labels."
        : "No results: the collection is empty.";
      renderResults(reply.results, "Most similar", empty);
    } catch (error) {
      handleError(error);
    } finally {
      setBusy(false);
    }
  }

  // More like this: SearchById, the stored item left out, in the collection its result came from.
  async function searchById(id, collection) {
    state.last = { kind: "id", id, collection };
    const filtered = filterKey();
    const wanted = () =>
      state.last && state.last.kind === "id" && state.last.id === id && filterKey() === filtered;
    setBusy(true);
    try {
      const path = inCollection(`/api/search?id=${encodeURIComponent(id)}&k=${k()}`, collection);
      const reply = await api(withLabels(path));
      if (!wanted()) return;
      if ($("status").classList.contains("error")) showStatus("");
      showAnswered(reply);
      showFilterAndNotice(reply);
      const empty = state.labels.length
        ? "No other images with those labels."
        : "No other images in the collection.";
      renderResults(reply.results, `More like ${id}`, empty);
      showQuery(`More like ${id}`, null, null);
      showNovelty(reply);
      const item = await itemView(id);
      if (!wanted()) return;
      showQuery(`More like ${id}`, item.thumbnail_url, item.view);
      window.scrollTo({ top: 0, behavior: "smooth" });
    } catch (error) {
      handleError(error);
    } finally {
      setBusy(false);
    }
  }

  function rerun() {
    const last = state.last;
    if (!last) return;
    if (last.kind === "id") searchById(last.id, last.collection);
    else searchUpload(last.blob, last.name, last.preview);
  }

  // Upload: the file picker and drag and drop.
  let previewUrl = null;
  function searchFile(file) {
    if (!file) return;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    searchUpload(file, file.name || "upload", previewUrl);
  }

  function setUpUpload() {
    const drop = $("drop");
    $("file").addEventListener("change", (event) => {
      searchFile(event.target.files[0]);
      event.target.value = "";
    });
    for (const name of ["dragenter", "dragover"]) {
      drop.addEventListener(name, (event) => {
        event.preventDefault();
        drop.classList.add("over");
      });
    }
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      searchFile(event.dataTransfer.files[0]);
    });
    // a file dropped beside the drop zone must not make the browser leave the page
    document.addEventListener("dragover", (event) => event.preventDefault());
    document.addEventListener("drop", (event) => event.preventDefault());
  }

  // Drawing: white strokes on black, as MNIST; mouse, pen and touch through pointer events.
  function setUpCanvas() {
    const canvas = $("canvas");
    const context = canvas.getContext("2d");
    let drawing = false;
    let inked = false;
    let last = null;
    let timer = null;

    function clear() {
      context.fillStyle = "#000";
      context.fillRect(0, 0, canvas.width, canvas.height);
      inked = false;
    }

    function point(event) {
      const box = canvas.getBoundingClientRect();
      return {
        x: ((event.clientX - box.left) * canvas.width) / box.width,
        y: ((event.clientY - box.top) * canvas.height) / box.height,
      };
    }

    function stroke(from, to) {
      context.strokeStyle = "#fff";
      context.lineWidth = 20;
      context.lineCap = "round";
      context.lineJoin = "round";
      context.beginPath();
      context.moveTo(from.x, from.y);
      context.lineTo(to.x, to.y);
      context.stroke();
      inked = true;
    }

    function searchDrawing() {
      if (!inked) {
        showStatus("Draw a digit first.", "info");
        return;
      }
      const preview = canvas.toDataURL("image/png");
      canvas.toBlob((blob) => blob && searchUpload(blob, "drawing.png", preview), "image/png");
    }

    canvas.addEventListener("pointerdown", (event) => {
      event.preventDefault();
      clearTimeout(timer);
      canvas.setPointerCapture(event.pointerId);
      drawing = true;
      last = point(event);
      stroke(last, last);
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!drawing) return;
      const next = point(event);
      stroke(last, next);
      last = next;
    });
    const finish = () => {
      if (!drawing) return;
      drawing = false;
      clearTimeout(timer);
      timer = setTimeout(searchDrawing, 400); // search once the pen rests
    };
    canvas.addEventListener("pointerup", finish);
    canvas.addEventListener("pointercancel", finish);
    $("clear").addEventListener("click", () => {
      clearTimeout(timer);
      clear();
    });
    $("search-drawing").addEventListener("click", () => {
      clearTimeout(timer);
      searchDrawing();
    });
    clear();
  }

  function setUpK() {
    const select = $("k");
    const choices = KS.filter((n) => n <= state.config.max_k);
    if (!choices.includes(state.config.default_k)) choices.push(state.config.default_k);
    choices.sort((a, b) => a - b);
    select.replaceChildren(
      ...choices.map((n) => {
        const option = el("option", "", n);
        option.value = String(n);
        option.selected = n === state.config.default_k;
        return option;
      })
    );
    select.addEventListener("change", rerun);
  }

  // Adding images: only when the gateway allows it (--allow-indexing), with the token.
  function setUpAdding() {
    if (!state.config.indexing) return;
    $("add-panel").hidden = false;
    $("add-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const file = $("add-file").files[0];
      const form = new FormData();
      form.append("file", file, file.name);
      form.append("id", $("add-id").value);
      form.append("label", $("add-label").value);
      const collection = picked();
      if (collection) form.append("collection", collection);
      $("add-result").textContent = "adding…";
      try {
        const reply = await api("/api/items", {
          method: "POST",
          body: form,
          headers: { Authorization: `Bearer ${$("add-token").value}` },
        });
        const where = collection ? `the collection ${collection}` : "the collection";
        $("add-result").textContent = `added ${reply.id}; ${where} holds ${reply.count}`;
        loadCollections().then(refreshStatus);
      } catch (error) {
        $("add-result").textContent = error.message;
      }
    });
  }

  async function start() {
    setUpReadToken();
    try {
      state.config = await api("/api/config");
    } catch (error) {
      showStatus(error.message);
    }
    state.hint = $("results-hint").textContent;
    state.labels = addressLabels();
    await loadCollections();
    setUpCollections();
    setUpLabels();
    await loadLabels();
    setUpK();
    setUpUpload();
    setUpCanvas();
    setUpAdding();
    await refreshStatus();
    setInterval(refreshStatus, HEALTH_EVERY_MS);
    document.body.dataset.ready = "1";
  }

  start();
})();
