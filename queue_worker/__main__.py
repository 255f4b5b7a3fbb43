from queue_worker.cli import main

main()
