// Package bolt is the embedded kms.Store: one bbolt file under the data dir,
// fsynced on every commit.
package bolt

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	bbolt "go.etcd.io/bbolt"
	bberrors "go.etcd.io/bbolt/errors"

	"kmsd/kms"
)

var (
	bucketBlobs  = []byte("blob_owners") // blob digest -> key name
	bucketKeys   = []byte("keys")
	bucketTokens = []byte("tokens")
	bucketMeta   = []byte("meta")
	keySchema    = []byte("schema")
)

const schemaVersion = "1"

// ErrLocked is returned by Open when another process holds the file.
var ErrLocked = errors.New("the database is locked by another process (is another kmsd running on this data dir?)")

// Store is a kms.Store and kms.AuditStore on bbolt.
type Store struct {
	db          *bbolt.DB
	appendCh    chan appendReq
	quit        chan struct{}
	stopped     chan struct{}
	closeOnce   bool
	commits     atomic.Uint64
	auditGroups atomic.Uint64
}

var _ kms.Store = (*Store)(nil)

// Options tune Open.
type Options struct {
	// LockTimeout bounds the wait for the file lock (default 1s).
	LockTimeout time.Duration
}

// Open opens or creates the database file at path.
func Open(path string, o Options) (*Store, error) {
	if o.LockTimeout == 0 {
		o.LockTimeout = time.Second
	}
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: o.LockTimeout})
	if errors.Is(err, bberrors.ErrTimeout) {
		return nil, fmt.Errorf("open %s: %w", path, ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	err = db.Update(func(tx *bbolt.Tx) error {
		for _, b := range [][]byte{bucketKeys, bucketTokens, bucketMeta, bucketAuditRecords, bucketAuditCheckpoints, bucketBlobs} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		m := tx.Bucket(bucketMeta)
		switch v := m.Get(keySchema); {
		case v == nil:
			return m.Put(keySchema, []byte(schemaVersion))
		case string(v) != schemaVersion:
			return fmt.Errorf("database schema %q is not the supported %q", v, schemaVersion)
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialize %s: %w", path, err)
	}
	s := &Store{db: db, appendCh: make(chan appendReq, maxGroup), quit: make(chan struct{}), stopped: make(chan struct{})}
	go s.committer()
	return s, nil
}

// Close stops the audit committer and closes the file.
func (s *Store) Close() error {
	if !s.closeOnce {
		s.closeOnce = true
		close(s.quit)
		<-s.stopped
	}
	return s.db.Close()
}

// update runs fn in a write transaction and counts the commit.
func (s *Store) update(fn func(tx *bbolt.Tx) error) error {
	err := s.db.Update(fn)
	if err == nil {
		s.commits.Add(1)
	}
	return err
}

// Path is the file's path.
func (s *Store) Path() string { return s.db.Path() }

// Check runs bbolt's consistency check and returns the first problem found.
func (s *Store) Check() error {
	return s.db.View(func(tx *bbolt.Tx) error {
		var first error
		for err := range tx.Check() { // drain: Check's goroutine sends every problem
			if first == nil {
				first = err
			}
		}
		return first
	})
}

// Ping checks that the file can be read.
func (s *Store) Ping(ctx context.Context) error {
	return s.db.View(func(tx *bbolt.Tx) error {
		if tx.Bucket(bucketKeys) == nil {
			return errors.New("keys bucket missing")
		}
		return nil
	})
}

func notFound(what, name string) error {
	return &kms.Error{Kind: kms.KindNotFound, Msg: fmt.Sprintf("%s %q not found", what, name)}
}

func exists(what, name string) error {
	return &kms.Error{Kind: kms.KindAlreadyExists, Msg: fmt.Sprintf("%s %q already exists", what, name)}
}

// CreateKey implements kms.Store.
func (s *Store) CreateKey(ctx context.Context, k *kms.Key, audit []*kms.AuditRecord) error {
	buf, err := json.Marshal(k)
	if err != nil {
		return err
	}
	err = s.update(func(tx *bbolt.Tx) error {
		if tx.Bucket(bucketKeys).Get([]byte(k.Name)) != nil {
			return exists("key", k.Name)
		}
		return putKey(tx, k, buf, audit)
	})
	if err == nil {
		markCommitted(audit)
	}
	return err
}

func decodeKey(buf []byte) (*kms.Key, error) {
	var k kms.Key
	if err := json.Unmarshal(buf, &k); err != nil {
		return nil, fmt.Errorf("decode key record: %w", err)
	}
	return &k, nil
}

// GetKey implements kms.Store.
func (s *Store) GetKey(ctx context.Context, name string) (*kms.Key, error) {
	var k *kms.Key
	err := s.db.View(func(tx *bbolt.Tx) error {
		buf := tx.Bucket(bucketKeys).Get([]byte(name))
		if buf == nil {
			return notFound("key", name)
		}
		var err error
		k, err = decodeKey(buf)
		return err
	})
	return k, err
}

// ListKeys implements kms.Store.
func (s *Store) ListKeys(ctx context.Context, after string, limit int) ([]*kms.Key, error) {
	var out []*kms.Key
	err := s.db.View(func(tx *bbolt.Tx) error {
		c := tx.Bucket(bucketKeys).Cursor()
		var k, v []byte
		if after == "" {
			k, v = c.First()
		} else {
			k, v = c.Seek([]byte(after))
			if k != nil && bytes.Equal(k, []byte(after)) {
				k, v = c.Next()
			}
		}
		for ; k != nil && len(out) < limit; k, v = c.Next() {
			key, err := decodeKey(v)
			if err != nil {
				return err
			}
			out = append(out, key)
		}
		return nil
	})
	return out, err
}

// UpdateKey implements kms.Store.
func (s *Store) UpdateKey(ctx context.Context, name string, fn func(k *kms.Key) ([]*kms.AuditRecord, error)) error {
	var audit []*kms.AuditRecord
	err := s.update(func(tx *bbolt.Tx) error {
		b := tx.Bucket(bucketKeys)
		buf := b.Get([]byte(name))
		if buf == nil {
			return notFound("key", name)
		}
		k, err := decodeKey(buf)
		if err != nil {
			return err
		}
		if audit, err = fn(k); err != nil {
			return err
		}
		if k.Name != name {
			return errors.New("a key cannot be renamed")
		}
		out, err := json.Marshal(k)
		if err != nil {
			return err
		}
		return putKey(tx, k, out, audit)
	})
	if err == nil {
		markCommitted(audit)
	}
	return err
}

// CreateToken implements kms.Store.
func (s *Store) CreateToken(ctx context.Context, t *kms.Token, audit []*kms.AuditRecord) error {
	buf, err := json.Marshal(t)
	if err != nil {
		return err
	}
	err = s.update(func(tx *bbolt.Tx) error {
		b := tx.Bucket(bucketTokens)
		if b.Get([]byte(t.ID)) != nil {
			return exists("token", t.ID)
		}
		if err := b.Put([]byte(t.ID), buf); err != nil {
			return err
		}
		return appendAudit(tx, audit)
	})
	if err == nil {
		markCommitted(audit)
	}
	return err
}

// GetToken implements kms.Store.
func (s *Store) GetToken(ctx context.Context, id string) (*kms.Token, error) {
	var t kms.Token
	err := s.db.View(func(tx *bbolt.Tx) error {
		buf := tx.Bucket(bucketTokens).Get([]byte(id))
		if buf == nil {
			return notFound("token", id)
		}
		return json.Unmarshal(buf, &t)
	})
	if err != nil {
		return nil, err
	}
	return &t, nil
}

// CountTokens implements kms.Store.
func (s *Store) CountTokens(ctx context.Context) (int, error) {
	n := 0
	err := s.db.View(func(tx *bbolt.Tx) error {
		n = tx.Bucket(bucketTokens).Stats().KeyN
		return nil
	})
	return n, err
}

// putKey writes a key record, indexes its blobs and appends the audit
// records of the change, all in tx.
func putKey(tx *bbolt.Tx, k *kms.Key, buf []byte, audit []*kms.AuditRecord) error {
	if err := tx.Bucket(bucketKeys).Put([]byte(k.Name), buf); err != nil {
		return err
	}
	if err := indexBlobs(tx, k); err != nil {
		return err
	}
	return appendAudit(tx, audit)
}

// indexBlobs records which key owns each blob its versions list.
func indexBlobs(tx *bbolt.Tx, k *kms.Key) error {
	b := tx.Bucket(bucketBlobs)
	for _, v := range k.Versions {
		for _, d := range v.Blobs {
			if b.Get([]byte(d)) == nil {
				if err := b.Put([]byte(d), []byte(k.Name)); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// BlobOwner implements kms.Store.
func (s *Store) BlobOwner(ctx context.Context, digest string) (string, error) {
	var name string
	err := s.db.View(func(tx *bbolt.Tx) error {
		v := tx.Bucket(bucketBlobs).Get([]byte(digest))
		if v == nil {
			return notFound("blob", digest)
		}
		name = string(v)
		return nil
	})
	return name, err
}
