"""System tests: services as processes, crashes, the soak, the browser, compose and k8s files, training."""
