//go:build !unix

package hekeys

import (
	"context"
	"os"
)

// flock is a no-op where there is no flock: this process's own lock
// still orders its downloads.
func flock(context.Context, *os.File) error { return nil }
