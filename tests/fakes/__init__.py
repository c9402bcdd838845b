"""Stand-ins for camera libraries this machine cannot run (no camera hardware).

Each module here is named like the library it mirrors, so that a daemon
started with this folder on PYTHONPATH imports it instead of the real one.
"""
