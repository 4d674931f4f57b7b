"""What a runtime's client and the service share: the message codec, frame checks, the endpoint
file, the raw-socket fast path and the thread pipe that bridges grpcio's threads and trio."""
