from segx.bench.cli import main

main()
