"""The index service: exact-L2 k-NN over the user's ids and metadata, kept in FAISS."""
