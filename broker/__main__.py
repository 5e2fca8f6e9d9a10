from broker.cli import app

app()
