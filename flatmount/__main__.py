from flatmount.cli import run

run()
