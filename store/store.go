// Package store is kmsd's storage port: the one interface a storage
// backend implements for kmsd (Backend) and the registry its drivers add
// themselves to. Drivers live beside it (store/bolt, the embedded
// default; store/etcd, shared by replicas), share their record tags and
// digest through store/internal, and are checked by one suite,
// store/storetest. A program names the driver it wants (kmsd: --store)
// and imports the drivers it offers for their registration.
package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/internal/storekit"
)

// Backend is an open store: kms.Store (keys, versions, tokens), the audit
// log's rows through its engine, kmsd's own metadata, the integrity scrub,
// and leadership of background work among the processes sharing it.
type Backend interface {
	kms.Store
	// Audit is the audit log kept in this store.
	Audit() *engine.Log
	// Meta returns kmsd's metadata record key (nil if absent).
	Meta(key string) ([]byte, error)
	// PutMeta writes a metadata record.
	PutMeta(key string, value []byte) error
	// ClaimMeta writes value under key unless a value is there, and
	// returns the value that is there after the call.
	ClaimMeta(key string, value []byte) ([]byte, error)
	// Empty reports whether the store holds no key and no token.
	Empty() (bool, error)
	// Scrub checks every record's tag and the store digest; a finding
	// breaks the store (every read refused) and is a *kms.TamperError.
	Scrub(ctx context.Context) (ScrubReport, error)
	// Lead runs work while this process leads role among the processes
	// that share the store, until ctx ends; a store one process opens
	// runs it at once.
	Lead(ctx context.Context, role string, work func(context.Context))
	// Shared reports whether several processes (replicas) share the
	// store, so that what they keep beside it (HE blobs) must be shared
	// too.
	Shared() bool
	// Stats are figures for kmsd's stop log line, as slog attributes.
	Stats() []any
	Close() error
}

// Observer is told of each write transaction a store ends: how long it
// took and its outcome ("ok", "error", "rollback": refused before
// commit, or "conflict": a compare lost to another writer, re-read and
// retried).
type Observer = storekit.Observer

// Observable is a store that reports its write transactions (metrics).
type Observable interface {
	SetObserver(Observer)
}

// ScrubReport is what a scrub checked.
type ScrubReport = storekit.ScrubReport

// AsTamper returns the tamper finding err carries, or nil.
func AsTamper(err error) *kms.TamperError { return storekit.AsTamper(err) }

// Config is every driver's settings; each reads its own.
type Config struct {
	// DataDir is kmsd's data directory (bolt: kms.db and its audit WAL).
	DataDir string
	// AuditWALSize is the bolt audit write-ahead log's size in bytes.
	AuditWALSize int64
	// UpgradeUntagged tags the records of a store an older kmsd wrote
	// (README: Storage trust).
	UpgradeUntagged bool
	// Etcd is the etcd driver's connection.
	Etcd   Etcd
	Logger *slog.Logger
}

// Etcd is how the etcd driver reaches its cluster.
type Etcd struct {
	Endpoints     []string
	Prefix        string
	CA, Cert, Key string // PEM files; empty: plain HTTP (loopback only)
}

// Driver is one kind of store.
type Driver interface {
	// Check checks the settings, before anything touches the disk or the
	// network; its error names the setting.
	Check(cfg Config) error
	// Connect reaches the store (a cluster) or finds it (a file) without
	// opening it.
	Connect(cfg Config) (Conn, error)
}

// Conn is a store reached but not open yet: kmsd reads from it what it
// needs to open the HSM, then opens it with the HSM's sealer (which seals
// the store's record key).
type Conn interface {
	// Peek reads metadata record key, its tag not checked yet, and whether
	// the store holds no key and no token. A store another kmsd holds
	// exclusively fails here, before the HSM is touched.
	Peek(key string) (value []byte, empty bool, err error)
	// Open opens the store.
	Open(sealer kms.Sealer) (Backend, error)
	// Close releases the connection (after the Backend is closed).
	Close() error
}

var (
	mu      sync.Mutex
	drivers = map[string]Driver{}
)

// Register adds a driver under name; drivers call it from init.
func Register(name string, d Driver) {
	mu.Lock()
	defer mu.Unlock()
	if _, dup := drivers[name]; dup {
		panic("store: driver " + name + " registered twice")
	}
	drivers[name] = d
}

// Names lists the registered drivers, sorted.
func Names() []string {
	mu.Lock()
	defer mu.Unlock()
	var out []string
	for n := range drivers {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// ErrUnknown is a store name no driver registered.
var ErrUnknown = errors.New("unknown store")

// Lookup returns the driver named name.
func Lookup(name string) (Driver, error) {
	mu.Lock()
	d, ok := drivers[name]
	mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%w %q: want %s", ErrUnknown, name, strings.Join(Names(), " or "))
	}
	return d, nil
}

// ScrubEvery scrubs s every interval until ctx ends (Open scrubbed it at
// start). A finding breaks the store: from then on every request that
// reads it gets 500 store-tampered, and /readyz fails, until kmsd
// restarts on a store that passes.
func ScrubEvery(ctx context.Context, s Backend, every time.Duration, log *slog.Logger) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rep, err := s.Scrub(ctx)
		switch {
		case AsTamper(err) != nil:
			tp := AsTamper(err)
			log.Error("STORE TAMPERED: a record kmsd keeps was changed outside kmsd; every record is refused until kmsd restarts on a store that passes (restore the store from a backup; README: Storage trust)", "record", tp.Path, "reason", tp.Reason)
		case err != nil && ctx.Err() == nil:
			log.Warn("store scrub did not finish; it runs again at the next interval", "err", err)
		case err == nil:
			log.Debug("store scrub", "records", rep.Records, "took", rep.Took.String())
		}
	}
}
