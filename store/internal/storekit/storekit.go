// Package storekit holds what every kms.Store implementation does the same
// way: the list of change watchers, and the key transaction that hands out
// versions, takes new ones and checks what the caller's fn did.
package storekit

import (
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/kmsd-project/kmsd/kms"
)

// Watchers is a store's change watchers (kms.Store.Watch).
type Watchers struct {
	mu  sync.RWMutex
	fns []func([]kms.Change)
}

// Watch registers fn.
func (w *Watchers) Watch(fn func([]kms.Change)) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.fns = append(w.fns, fn)
}

// Notify tells every watcher what a committed transaction wrote.
func (w *Watchers) Notify(chs []kms.Change) {
	if len(chs) == 0 {
		return
	}
	w.mu.RLock()
	defer w.mu.RUnlock()
	for _, fn := range w.fns {
		fn(chs)
	}
}

// ScheduledAt is when a version is due for destruction, nil if it is not
// scheduled.
func ScheduledAt(v *kms.Version) *time.Time {
	if v.State == kms.StateDestroyScheduled && v.DestroyAt != nil {
		return v.DestroyAt
	}
	return nil
}

// KeyTx is a kms.KeyTx over one key's header, reading versions through
// Read on demand. After fn, the store writes Header, every Loaded version
// (moving its destroy-schedule entry from Due[n]) and every Added one.
type KeyTx struct {
	Header *kms.Key
	Latest uint64                  // the header's Latest when read
	Loaded map[uint64]*kms.Version // versions handed out, written back at commit
	Due    map[uint64]*time.Time   // their destroy-schedule entries when read
	Added  []*kms.Version
	// Read returns version n's record as stored, nil if absent.
	Read func(n uint64) ([]byte, error)
}

// NewKeyTx starts a transaction over header k.
func NewKeyTx(k *kms.Key, read func(n uint64) ([]byte, error)) *KeyTx {
	return &KeyTx{Header: k, Latest: k.Latest, Loaded: map[uint64]*kms.Version{}, Due: map[uint64]*time.Time{}, Read: read}
}

// Key implements kms.KeyTx.
func (t *KeyTx) Key() *kms.Key { return t.Header }

// Version implements kms.KeyTx.
func (t *KeyTx) Version(n uint64) (*kms.Version, error) {
	if v, ok := t.Loaded[n]; ok {
		return v, nil
	}
	for _, v := range t.Added {
		if v.Number == n {
			return v, nil
		}
	}
	missing := &kms.Error{Kind: kms.KindNotFound, Msg: fmt.Sprintf("key %q has no version %d", t.Header.Name, n)}
	if n < 1 || n > t.Latest {
		return nil, missing
	}
	buf, err := t.Read(n)
	if err != nil {
		return nil, err
	}
	if buf == nil {
		return nil, missing
	}
	v, err := DecodeVersion(buf)
	if err != nil {
		return nil, err
	}
	t.Loaded[n] = v
	if at := ScheduledAt(v); at != nil {
		c := *at
		t.Due[n] = &c
	}
	return v, nil
}

// AddVersion implements kms.KeyTx.
func (t *KeyTx) AddVersion(v *kms.Version) error {
	if v.Number != t.Header.Latest+1 {
		return fmt.Errorf("key %q: version %d added after version %d", t.Header.Name, v.Number, t.Header.Latest)
	}
	t.Added = append(t.Added, v)
	t.Header.Latest = v.Number
	return nil
}

// Check refuses what fn may not do to key name: rename it, change Latest
// other than by adding versions, point Primary or MinDecryptionVersion
// outside its versions, renumber a version.
func (t *KeyTx) Check(name string) error {
	k := t.Header
	switch {
	case k.Name != name:
		return errors.New("a key cannot be renamed")
	case k.Latest != t.Latest+uint64(len(t.Added)):
		return errors.New("a key's latest version changes only by adding versions")
	case k.Primary < 1 || k.Primary > k.Latest || k.MinDecryptionVersion > k.Latest:
		return fmt.Errorf("key %q: primary %d or min_decryption_version %d is not a version", name, k.Primary, k.MinDecryptionVersion)
	}
	for n, v := range t.Loaded {
		if v.Number != n {
			return errors.New("a version's number cannot change")
		}
	}
	return nil
}

// DecodeVersion decodes a stored version record.
func DecodeVersion(buf []byte) (*kms.Version, error) {
	var v kms.Version
	if err := json.Unmarshal(buf, &v); err != nil {
		return nil, fmt.Errorf("decode version record: %w", err)
	}
	return &v, nil
}
