"""Images from container registries: references, the distribution API client, the layer store.

``reference`` parses names, ``registry`` speaks the OCI distribution API (with ``auth`` and
``manifest``), ``extract`` unpacks one layer safely, ``store`` keeps layers by digest and images by
reference, and ``pull`` ties them together. Stdlib only; blocking (the runtime calls ``pull`` in a
thread).
"""
