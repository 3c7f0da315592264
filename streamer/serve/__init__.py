"""`streamer serve`: online scoring over HTTP with the stream's pipeline and card histories."""
