"""Tasks: where prompts come from and how their responses are judged (DESIGN §5)."""
