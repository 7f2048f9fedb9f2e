"""Built-in architecture plugins, installed as ``rmconvert.plugins``; each uses the public hook."""
