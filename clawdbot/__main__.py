from clawdbot.cli import run

run()
