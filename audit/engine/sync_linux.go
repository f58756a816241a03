package engine

import (
	"os"
	"syscall"
)

// fdatasync flushes the file's data, not its times: the WAL overwrites
// blocks it already has, so nothing else needs to reach the disk.
func fdatasync(f *os.File) error {
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if err != syscall.EINTR {
			return err
		}
	}
}
