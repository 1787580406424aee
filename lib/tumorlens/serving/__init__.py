"""``tumorlens serve``: starts the real MONAI Label server with the tumorlens app (``monai_app/``)."""
