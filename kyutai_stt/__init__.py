"""kyutai-stt: streaming speech-to-text on Kyutai delayed-streams models."""
