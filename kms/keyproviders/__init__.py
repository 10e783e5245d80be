"""Where key encryption keys live: in the environment (kms.keyproviders.environment) or in a
PKCS#11 token (kms.keyproviders.pkcs11). A KEK version is one provider's key; versions may mix
providers. Every KEK seals and opens with AES-256-GCM and the same associated data, so a DEK
wrapped under one provider and re-wrapped under another keeps the same stored format.

base.py says what every provider offers; opening.py opens the configured ones at start-up."""
