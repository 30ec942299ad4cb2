# Gives these tests the gitplug_client / gitplug_app / gitplug_extension fixtures:
# the plugin in this repository, mounted in a fresh host app by a real GitPlug,
# exactly as the test gate and the server load it.
pytest_plugins = ["gitplug.testing"]
