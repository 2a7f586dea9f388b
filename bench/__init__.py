"""The benchmark (`make bench`): every service figure beside its in-process reference, in one run."""
