"""The ceiling of the HTTP stack: gunicorn + Flask answering an empty JSON route."""

from flask import Flask, jsonify

app = Flask(__name__)


@app.get("/empty")
def empty():  # type: ignore[no-untyped-def]
    return jsonify({})
