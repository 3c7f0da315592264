"""Keyed state kept by the stream: stores, their changelog codec, and the card history."""
