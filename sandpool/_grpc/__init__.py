"""What a runtime's client and the service share, below both: the message codec and its bounds
(``messages``, ``limits``), frame checks, the endpoint file, the fast plane's handshake and raw
socket, and the bridge between grpcio's threads and trio."""
