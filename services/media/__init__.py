"""A message's photos, voice messages and files, turned into what the conversation needs."""
