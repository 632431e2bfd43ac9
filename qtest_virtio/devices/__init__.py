"""Device drivers (blk, net, rng, console, balloon, scsi) and their feature and config layouts."""
