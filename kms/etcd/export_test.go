package etcd

import "testing"

// SetBeforeCommit runs f as every transaction of a state change is sent,
// for one test.
func SetBeforeCommit(t *testing.T, f func()) {
	testHookBeforeCommit = f
	t.Cleanup(func() { testHookBeforeCommit = nil })
}
