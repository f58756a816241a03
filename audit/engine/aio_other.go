//go:build !linux

package engine

import (
	"errors"
	"os"
)

var errAIOUnsupported = errors.New("native AIO fdatasync unsupported")

// asyncSyncer exists on Linux only; elsewhere the WAL uses fdatasync.
type asyncSyncer struct{}

func newAsyncSyncer() (*asyncSyncer, error) { return nil, errAIOUnsupported }

func (a *asyncSyncer) fdatasync(*os.File) error { return errAIOUnsupported }

func (a *asyncSyncer) close() {}
