"""The circuit: compile and cache, the client's keys, the server's runtime, the simulator."""
