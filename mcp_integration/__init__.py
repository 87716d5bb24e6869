"""voice-mcp core: a registry of MCP servers, every transport, and tool calls as jobs. No LiveKit imports here."""
