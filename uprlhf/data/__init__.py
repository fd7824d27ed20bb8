"""Data: canonical loaders and writers, the embedded sentiment task and its gold scorers."""
