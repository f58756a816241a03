package store_test

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/store"
	_ "github.com/kmsd-project/kmsd/store/bolt"
	_ "github.com/kmsd-project/kmsd/store/etcd"
)

func TestMain(m *testing.M) { testhsm.Main(m) }

// TestDriversRegisterThemselves: importing a driver is all it takes to
// offer it; an unknown name is refused naming the known ones.
func TestDriversRegisterThemselves(t *testing.T) {
	if got := store.Names(); !slices.Equal(got, []string{"bolt", "etcd"}) {
		t.Fatalf("drivers %v", got)
	}
	_, err := store.Lookup("mysql")
	if !errors.Is(err, store.ErrUnknown) || !strings.Contains(err.Error(), "bolt or etcd") {
		t.Fatalf("unknown store: %v", err)
	}
}

// TestChecksNameTheSetting: each driver checks its own settings before
// anything is touched, naming the flag.
func TestChecksNameTheSetting(t *testing.T) {
	bolt, _ := store.Lookup("bolt")
	etcd, _ := store.Lookup("etcd")
	for _, c := range []struct {
		d    store.Driver
		cfg  store.Config
		want string
	}{
		{bolt, store.Config{Etcd: store.Etcd{Endpoints: []string{"http://127.0.0.1:2379"}}}, "--etcd-endpoints is for --store etcd"},
		{etcd, store.Config{Etcd: store.Etcd{Prefix: "/kmsd/"}}, "needs --etcd-endpoints"},
		{etcd, store.Config{Etcd: store.Etcd{Prefix: "/kmsd/", Endpoints: []string{"https://u:secret@10.0.0.1:2379"}}}, "carries credentials"},
		{etcd, store.Config{Etcd: store.Etcd{Prefix: "/kmsd/", Endpoints: []string{"http://10.0.0.1:2379"}}}, "not loopback"},
		{etcd, store.Config{Etcd: store.Etcd{Prefix: "kmsd/", Endpoints: []string{"http://127.0.0.1:2379"}}}, "--etcd-prefix"},
		{etcd, store.Config{Etcd: store.Etcd{Prefix: "/kmsd/", Endpoints: []string{"https://10.0.0.1:2379"}, Cert: "c.pem"}}, "go together"},
	} {
		err := c.d.Check(c.cfg)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "secret") {
			t.Errorf("%+v: %v, want %q", c.cfg, err, c.want)
		}
	}
	if err := bolt.Check(store.Config{}); err != nil {
		t.Errorf("bolt with no settings: %v", err)
	}
}

// TestBoltThroughThePort: the embedded driver through the port alone:
// a new data dir peeks empty, opens with a sealer, keeps metadata, leads
// at once, and a second open of the same file is refused while the first
// holds it.
func TestBoltThroughThePort(t *testing.T) {
	d, _ := store.Lookup("bolt")
	cfg := store.Config{DataDir: t.TempDir(), AuditWALSize: 1 << 20}
	conn, err := d.Connect(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if v, empty, err := conn.Peek("x-k"); err != nil || v != nil || !empty {
		t.Fatalf("peek of a new data dir: %q %v %v", v, empty, err)
	}
	b, err := conn.Open(testhsm.Open(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.PutMeta("x-k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if v, err := b.Meta("x-k"); err != nil || string(v) != "v" {
		t.Fatalf("meta: %q %v", v, err)
	}
	led := false
	b.Lead(t.Context(), "job", func(context.Context) { led = true })
	if !led || b.Shared() {
		t.Fatalf("bolt leads at once (%v) and is not shared (%v)", led, b.Shared())
	}
	if _, err := b.Scrub(t.Context()); err != nil {
		t.Fatalf("scrub: %v", err)
	}
	conn2, _ := d.Connect(cfg)
	if _, _, err := conn2.Peek("x-k"); err == nil {
		t.Fatal("a second kmsd peeked a kms.db the first holds")
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	// Closed, it opens again and kept what was written.
	conn3, _ := d.Connect(cfg)
	if v, empty, err := conn3.Peek("x-k"); err != nil || string(v) != "v" || !empty {
		t.Fatalf("peek after close: %q %v %v (kms.db at %s)", v, empty, err, filepath.Join(cfg.DataDir, "kms.db"))
	}
}
