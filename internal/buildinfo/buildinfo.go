// Package buildinfo says which build of a kmsd program is running: its
// module version, the commit it was built from and the Go that built it,
// as the Go toolchain recorded them in the binary.
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// String is "<program> <version> (commit <hash>[, modified], <go version>)".
func String(program string) string {
	version, commit, modified := "(devel)", "unknown", false
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v := bi.Main.Version; v != "" {
			version = v
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				commit = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	if len(commit) > 12 {
		commit = commit[:12]
	}
	if modified {
		commit += ", modified"
	}
	return fmt.Sprintf("%s %s (commit %s, %s)", program, version, commit, runtime.Version())
}
