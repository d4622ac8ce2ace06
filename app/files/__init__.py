"""Files: uploads owned by a token, and the gateway file URLs found in prediction inputs."""
