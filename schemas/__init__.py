"""marshmallow schemas: they validate requests and, through flask-smorest, generate /openapi.json."""
