"""Serving, one module per concern; ``service.py`` wires them into the BentoML service.

- ``schemas``: the JSON answers.
- ``uploads``: the upload type, its checks and the shared preprocessing of a request.
- ``prediction_log``: the JSON-lines prediction log, written off the request path.
- ``middleware``: auth, body limits and connection recycling, before any body is read.
- ``batching``: adaptive batching of in-process model calls.
- ``compat``: every use of BentoML internals, with the version they were written for.
"""
