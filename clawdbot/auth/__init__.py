"""Who is calling: tokens, identity providers, sign-in sessions."""
