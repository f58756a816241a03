package bolt_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store"
	"github.com/kmsd-project/kmsd/store/bolt"
	"github.com/kmsd-project/kmsd/store/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) kms.Store {
		s, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	})
}

func TestMetaConformance(t *testing.T) {
	storetest.RunMeta(t, func(t *testing.T) storetest.MetaStore {
		s, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	})
}

func TestAuditConformance(t *testing.T) {
	storetest.RunAudit(t, func(t *testing.T) interface {
		kms.Store
		kms.AuditStore
	} {
		s, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return struct {
			kms.Store
			kms.AuditStore
		}{s, s.Audit()}
	})
}

// TestSecondOpenFailsFast: a second open of a locked file fails within the
// lock timeout with ErrLocked.
func TestSecondOpenFailsFast(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kms.db")
	s, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, err = bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t), LockTimeout: 100 * time.Millisecond})
	if !errors.Is(err, bolt.ErrLocked) || !strings.Contains(err.Error(), "another kmsd") {
		t.Fatalf("second open: %v", err)
	}
}

// TestSurvivesReopen: what was committed is there after close and reopen.
func TestSurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kms.db")
	s, _ := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)})
	ctx := context.Background()
	if err := s.CreateKey(ctx, &kms.Key{Name: "a", Primary: 1, Latest: 1}, &kms.Version{Number: 1, Sealed: []byte("x")}, nil); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if v, err := s.GetVersion(ctx, "a", 1); err != nil || string(v.Sealed) != "x" {
		t.Fatalf("after reopen: %+v %v", v, err)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestRefusesOtherFiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kms.db")
	os.WriteFile(path, []byte(strings.Repeat("not a database ", 1000)), 0o600)
	if _, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)}); err == nil {
		t.Fatal("opened a file that is not a bbolt database")
	}
}

func TestMain(m *testing.M) { testhsm.Main(m) }

func TestDumpLoad(t *testing.T) {
	storetest.RunDump(t, func(t *testing.T) store.Backend {
		s, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}, func(t *testing.T) storetest.Target {
		d, err := store.Lookup("bolt")
		if err != nil {
			t.Fatal(err)
		}
		c, err := d.Connect(store.Config{DataDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
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
