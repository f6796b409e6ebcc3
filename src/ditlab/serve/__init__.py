"""`ditlab serve`: a page and a JSON API sampling one checkpoint for many users, who share the
model's batches without their images depending on one another (see `batcher.py`).

Needs the `serve` extra (Starlette and uvicorn): `pip install 'ditlab[serve]'`."""
