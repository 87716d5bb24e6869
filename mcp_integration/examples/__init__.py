"""Small MCP servers shipped with the project, for the offline demo."""
