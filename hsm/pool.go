package hsm

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// pool hands out PKCS#11 sessions so that no session is used by two
// goroutines at once (PKCS#11 v2.40 §6.7.6). It opens sessions lazily up to
// max and replaces a session whose handle the token no longer knows.
type pool struct {
	mod  Module
	slot uint
	idle chan pkcs11.SessionHandle
	sem  chan struct{} // one token per session that exists or is being opened

	mu     sync.Mutex
	closed bool
}

func newPool(mod Module, slot uint, max int) *pool {
	return &pool{mod: mod, slot: slot, idle: make(chan pkcs11.SessionHandle, max), sem: make(chan struct{}, max)}
}

// with runs fn on a session of its own.
func (p *pool) with(ctx context.Context, fn func(pkcs11.SessionHandle) error) error {
	sh, err := p.get(ctx)
	if err != nil {
		return err
	}
	err = fn(sh)
	if broken(err) || errors.Is(err, errDirtySession) {
		_ = p.mod.CloseSession(sh)
		<-p.sem
		return err
	}
	p.put(sh)
	return err
}

// sessionWait bounds how long a caller waits for a session when the
// token allows fewer than the pool would open (CKR_SESSION_COUNT).
const sessionWait = 5 * time.Second

func (p *pool) get(ctx context.Context) (pkcs11.SessionHandle, error) {
	select {
	case sh := <-p.idle:
		return sh, nil
	default:
	}
	var waitUntil time.Time
	for {
		select {
		case sh := <-p.idle:
			return sh, nil
		case p.sem <- struct{}{}:
			p.mu.Lock()
			closed := p.closed
			p.mu.Unlock()
			if closed {
				<-p.sem
				return 0, ErrClosed
			}
			sh, err := p.mod.OpenSession(p.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
			if err == nil {
				return sh, nil
			}
			<-p.sem
			// The token allows fewer sessions than the pool would
			// open: wait a moment for one to come back (or to be
			// closed, freeing room to open one), for sessionWait.
			if rv(err) != pkcs11.CKR_SESSION_COUNT {
				return 0, err
			}
			if waitUntil.IsZero() {
				waitUntil = time.Now().Add(sessionWait)
			} else if time.Now().After(waitUntil) {
				return 0, err
			}
			select {
			case sh := <-p.idle:
				return sh, nil
			case <-time.After(5 * time.Millisecond):
			case <-ctx.Done():
				return 0, ctx.Err()
			}
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

func (p *pool) put(sh pkcs11.SessionHandle) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		_ = p.mod.CloseSession(sh)
		<-p.sem
		return
	}
	p.idle <- sh
}

func (p *pool) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	for {
		select {
		case sh := <-p.idle:
			_ = p.mod.CloseSession(sh)
			<-p.sem
		default:
			return
		}
	}
}

// broken reports whether err means the session can not be used again.
func broken(err error) bool {
	switch rv(err) {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_DEVICE_ERROR,
		pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_OPERATION_ACTIVE,
		pkcs11.CKR_GENERAL_ERROR:
		return true
	}
	return false
}
