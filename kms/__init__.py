"""KMS: a key management service for one organisation's internal services.

The app factory is kms.app.create_app; importing this package loads nothing else.
"""
