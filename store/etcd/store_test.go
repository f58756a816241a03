package etcd_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/internal/testetcd"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store"
	"github.com/kmsd-project/kmsd/store/etcd"
	"github.com/kmsd-project/kmsd/store/storetest"
)

var (
	cluster  *testetcd.Cluster
	prefixes atomic.Uint64
)

// member is one etcd member for the package's tests, started by the first
// that needs it; each test takes a prefix of its own (an empty store).
func member(t testing.TB) *testetcd.Cluster {
	if cluster == nil {
		cluster = testetcd.Start(packageTB{t}, 1)
	}
	return cluster
}

// packageTB keeps the member running past the test that starts it
// (TestMain stops it).
type packageTB struct{ testing.TB }

func (packageTB) Cleanup(func()) {}
func (p packageTB) TempDir() string {
	d, err := os.MkdirTemp("", "kmsd-etcd-")
	if err != nil {
		p.TB.Fatal(err)
	}
	return d
}

func TestMain(m *testing.M) { testhsm.Main(wrapped{m}) }

// wrapped stops the package's etcd member after the tests.
type wrapped struct{ *testing.M }

func (w wrapped) Run() int {
	code := w.M.Run()
	if cluster != nil {
		cluster.Stop()
		cluster.RemoveAll()
	}
	return code
}

// client returns a client of the package's member, closed at the test's
// end.
func client(t testing.TB) *clientv3.Client {
	c, err := clientv3.New(etcd.ClientConfig(member(t).Endpoints(), nil))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func newPrefix(t testing.TB) string {
	return fmt.Sprintf("/test-%d-%s/", prefixes.Add(1), strings.ReplaceAll(t.Name(), "/", "-"))
}

// open returns a Store on prefix (a replica: several may share one).
func open(t *testing.T, prefix string) *etcd.Store {
	s, err := etcd.Open(context.Background(), client(t), etcd.Options{Prefix: prefix, Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) kms.Store { return open(t, newPrefix(t)) })
}

func TestMetaConformance(t *testing.T) {
	storetest.RunMeta(t, func(t *testing.T) storetest.MetaStore { return open(t, newPrefix(t)) })
}

func TestAuditConformance(t *testing.T) {
	storetest.RunAudit(t, func(t *testing.T) interface {
		kms.Store
		kms.AuditStore
	} {
		s := open(t, newPrefix(t))
		return struct {
			kms.Store
			kms.AuditStore
		}{s, s.Audit()}
	})
}

func TestDumpLoad(t *testing.T) {
	storetest.RunDump(t, func(t *testing.T) store.Backend { return open(t, newPrefix(t)) }, func(t *testing.T) storetest.Target {
		d, err := store.Lookup("etcd")
		if err != nil {
			t.Fatal(err)
		}
		c, err := d.Connect(store.Config{Etcd: store.Etcd{Endpoints: member(t).Endpoints(), Prefix: newPrefix(t)}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		sealer := testhsm.Open(t)
		return storetest.Target{Loader: c.(store.Loader), Sealer: sealer, Open: func(t *testing.T) store.Backend {
			s, err := c.Open(sealer)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			return s
		}}
	})
}
