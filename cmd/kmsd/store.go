package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/internal/tlsutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/bolt"
	"github.com/kmsd-project/kmsd/kms/etcd"
	"github.com/kmsd-project/kmsd/kms/storekit"
)

// backend is what kmsd needs of a store beyond kms.Store.
type backend interface {
	kms.Store
	Audit() *engine.Log
	Meta(key string) ([]byte, error)
	PutMeta(key string, value []byte) error
	ClaimMeta(key string, value []byte) ([]byte, error)
	Empty() (bool, error)
	// Scrub checks every record's tag and the store digest.
	Scrub(ctx context.Context) (storekit.ScrubReport, error)
}

// checkStore checks the store settings before anything touches the disk.
func checkStore(c config) error {
	switch c.store {
	case "bolt":
		if c.etcdEndpoints != "" {
			return errors.New("--etcd-endpoints is for --store etcd")
		}
		return nil
	case "etcd":
	default:
		return fmt.Errorf("--store %q: want bolt (the embedded default) or etcd", c.store)
	}
	if c.etcdEndpoints == "" {
		return errors.New("--store etcd needs --etcd-endpoints (comma-separated URLs of the cluster's members, e.g. https://10.0.0.1:2379)")
	}
	for i, e := range strings.Split(c.etcdEndpoints, ",") {
		u, err := url.Parse(e)
		if err == nil && u.User != nil {
			// Not echoed: the URL holds a password, which must not reach
			// a log or an error message.
			return fmt.Errorf("--etcd-endpoints: endpoint %d carries credentials; kmsd authenticates to etcd with --etcd-cert/--etcd-key only", i+1)
		}
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
			return fmt.Errorf("--etcd-endpoints: %q is not an http:// or https:// URL of a member", e)
		}
		if u.Scheme == "http" && !isLoopback(u.Hostname()) {
			return fmt.Errorf("--etcd-endpoints: %q is plain HTTP to a host that is not loopback: use https:// with --etcd-ca (and --etcd-cert/--etcd-key)", e)
		}
	}
	if (c.etcdCert == "") != (c.etcdKey == "") {
		return errors.New("--etcd-cert and --etcd-key go together")
	}
	if !strings.HasPrefix(c.etcdPrefix, "/") {
		return fmt.Errorf("--etcd-prefix %q must start with /", c.etcdPrefix)
	}
	if _, err := etcdTLS(c); err != nil {
		return err
	}
	return nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// etcdTLS is the client TLS configuration, nil for plain loopback.
func etcdTLS(c config) (*tls.Config, error) {
	if c.etcdCA == "" && c.etcdCert == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.etcdCA != "" {
		pool, err := tlsutil.LoadPool(c.etcdCA)
		if err != nil {
			return nil, fmt.Errorf("--etcd-ca: %w", err)
		}
		cfg.RootCAs = pool
	}
	if c.etcdCert != "" {
		cert, err := tls.LoadX509KeyPair(c.etcdCert, c.etcdKey)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// storeConn is the configured store before it is opened: Peek reads what
// kmsd needs to open the HSM, Open opens the store with the HSM's sealer
// (which seals the store's record key).
type storeConn struct {
	c   config
	log *slog.Logger
	cli *clientv3.Client // etcd only
}

// connectStore connects to the configured store (etcd) or finds its file.
func connectStore(c config, log *slog.Logger) (*storeConn, error) {
	sc := &storeConn{c: c, log: log}
	if c.store == "bolt" {
		return sc, nil
	}
	tcfg, err := etcdTLS(c)
	if err != nil {
		return nil, err
	}
	if sc.cli, err = clientv3.New(etcd.ClientConfig(strings.Split(c.etcdEndpoints, ","), tcfg)); err != nil {
		return nil, fmt.Errorf("etcd: %w", err)
	}
	return sc, nil
}

func (sc *storeConn) boltPath() string { return filepath.Join(sc.c.dataDir, "kms.db") }

// Close closes the etcd client (after the store).
func (sc *storeConn) Close() error {
	if sc.cli != nil {
		return sc.cli.Close()
	}
	return nil
}

// etcdErr says what to check when etcd does not answer.
func (sc *storeConn) etcdErr(err error) error {
	if errors.Is(err, context.DeadlineExceeded) {
		hint := "is etcd running there?"
		if strings.Contains(sc.c.etcdEndpoints, "https://") {
			hint = "is etcd running there, does --etcd-ca verify its certificate, and do --etcd-cert/--etcd-key hold a client certificate it accepts?"
		}
		return fmt.Errorf("etcd did not answer at %s: %w (%s)", sc.c.etcdEndpoints, err, hint)
	}
	return fmt.Errorf("%w (endpoints %s)", err, sc.c.etcdEndpoints)
}

// Peek reads the store's metadata value key, its tag not checked yet, and
// whether the store holds no key and no token. On bbolt it fails fast
// with bolt.ErrLocked while another kmsd has the file, before kmsd
// touches the HSM.
func (sc *storeConn) Peek(key string) ([]byte, bool, error) {
	if sc.cli == nil {
		return bolt.Peek(sc.boltPath(), key, bolt.Options{})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	v, empty, err := etcd.Peek(ctx, sc.cli, sc.c.etcdPrefix, key)
	if err != nil {
		return nil, false, sc.etcdErr(err)
	}
	return v, empty, nil
}

// Open opens the store; close closes it.
func (sc *storeConn) Open(sealer kms.Sealer) (s backend, close func() error, err error) {
	c, log := sc.c, sc.log
	if sc.cli == nil {
		b, err := bolt.Open(sc.boltPath(), bolt.Options{AuditWALSize: c.auditWALMiB << 20, Sealer: sealer, UpgradeUntagged: c.upgradeStore})
		if err != nil {
			return nil, nil, err
		}
		if m := b.Migration(); m.From != "" {
			// A warning: it must happen once per store (README: Storage
			// trust), at the first start after the upgrade.
			log.Warn("kms.db migrated; records written before tags got theirs", "from_schema", m.From, "to_schema", m.To, "keys", m.Keys, "versions", m.Versions, "records_tagged", m.Records)
		}
		if b.Audit().JournalMissing() {
			log.Error("audit WAL: the file kms.db-audit-wal was missing at start beside a database with records: records acknowledged after the last flush before the previous stop, if any, are lost; a new WAL was made")
		}
		if n := b.Audit().JournalRecovered(); n > 0 {
			log.Info("audit WAL: copied records acknowledged before a crash into kms.db", "records", n)
		}
		return b, b.Close, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	e, err := etcd.Open(ctx, sc.cli, etcd.Options{Prefix: c.etcdPrefix, Logger: log, Sealer: sealer, UpgradeUntagged: c.upgradeStore})
	if err != nil {
		return nil, nil, sc.etcdErr(err)
	}
	if n := e.Upgraded(); n > 0 {
		log.Warn("store: gave their tags to the records an older kmsd wrote (must happen once per prefix: README, Storage trust)", "records", n)
	}
	log.Info("store: etcd", "endpoints", c.etcdEndpoints, "prefix", c.etcdPrefix, "cache_bound", etcd.Bound().String())
	return e, e.Close, nil
}

// leader is how background work elects its replica: nil (always) for the
// embedded store, an etcd election for the replicated one.
func leader(s backend) func(context.Context, string, func(context.Context)) {
	if e, ok := s.(*etcd.Store); ok {
		return e.Lead
	}
	return nil
}

// scrubEvery checks the store's records and digest every interval until
// ctx ends (Open checked them at start). A failed check breaks the store:
// from then on every request that reads it gets 500 store-tampered, and
// /readyz fails, until kmsd restarts on a store that passes.
func scrubEvery(ctx context.Context, s backend, every time.Duration, log *slog.Logger) {
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
		case storekit.AsTamper(err) != nil:
			tp := storekit.AsTamper(err)
			log.Error("STORE TAMPERED: a record kmsd keeps was changed outside kmsd; every record is refused until kmsd restarts on a store that passes (restore the store from a backup; README: Storage trust)", "record", tp.Path, "reason", tp.Reason)
		case err != nil && ctx.Err() == nil:
			log.Warn("store scrub did not finish; it runs again at the next interval", "err", err)
		case err == nil:
			log.Debug("store scrub", "records", rep.Records, "took", rep.Took.String())
		}
	}
}
