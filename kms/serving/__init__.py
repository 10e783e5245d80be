"""How the KMS is served: the hardened waitress server and its edge limits."""
