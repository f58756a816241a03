package bolt

import (
	"context"
	"errors"
	"path/filepath"

	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store"
)

// The embedded default: kms.db under the data dir.
func init() { store.Register("bolt", driver{}) }

type driver struct{}

func (driver) Check(cfg store.Config) error {
	if len(cfg.Etcd.Endpoints) > 0 {
		return errors.New("--etcd-endpoints is for --store etcd")
	}
	return nil
}

func (driver) Connect(cfg store.Config) (store.Conn, error) {
	return conn{cfg: cfg, path: filepath.Join(cfg.DataDir, "kms.db")}, nil
}

// conn is kms.db, found (or to be made) but not open.
type conn struct {
	cfg  store.Config
	path string
}

// Peek fails fast with ErrLocked while another kmsd has the file.
func (c conn) Peek(key string) ([]byte, bool, error) { return Peek(c.path, key, Options{}) }

func (c conn) Open(sealer kms.Sealer) (store.Backend, error) {
	b, err := Open(c.path, Options{AuditWALSize: c.cfg.AuditWALSize, Sealer: sealer, UpgradeUntagged: c.cfg.UpgradeUntagged})
	if err != nil {
		return nil, err
	}
	log := c.cfg.Logger
	if log != nil {
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
	}
	return b, nil
}

func (conn) Close() error { return nil }

// Lead runs work at once: one process opens a bbolt file.
func (s *Store) Lead(ctx context.Context, _ string, work func(context.Context)) { work(ctx) }

// Shared is false: one process opens a bbolt file.
func (s *Store) Shared() bool { return false }

// Stats are the commit and fsync counts.
func (s *Store) Stats() []any {
	al := s.audit
	return []any{"store_commits", s.Commits(), "audit_group_commits", al.Groups(), "audit_wal_syncs", al.JournalSyncs(),
		"fsyncs", s.Fsyncs(), "audit_flush_errors", al.FlushErrors(), "audit_wal_recreated", al.JournalRecreated()}
}

var _ store.Backend = (*Store)(nil)
