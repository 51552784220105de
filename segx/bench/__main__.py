from segx.bench.cli import console

console()
