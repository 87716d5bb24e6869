"""voice-mcp core: a registry of MCP servers, every transport, and tool calls as jobs. No LiveKit imports here."""

# Said to every MCP server as our clientInfo; pyproject.toml carries the same number (a test keeps them equal).
__version__ = "0.1.0"
