from uisps.cli import app

app()
