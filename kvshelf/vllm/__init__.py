"""The only package that imports vLLM: the KVShelfConnector and its plugin hook."""
