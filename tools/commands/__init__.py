"""One thin module per CLI command: parse options, make one control request, print the result."""
