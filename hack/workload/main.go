// keepalive-workload: a tiny static test workload for hack/e2e.sh. It holds idle TCP connections so that the
// kernel's keepalive timers (and nothing else) decide what goes on the wire.
//
//	keepalive-workload server [--listen :7000]
//	keepalive-workload client --peer HOST:PORT [--keepalive N] [--plain M]
//	keepalive-workload classes --peer HOST:PORT
//
// The server accepts connections and never writes; its accepted sockets have no SO_KEEPALIVE. The client opens N
// connections with SO_KEEPALIVE on (and no per-socket TCP_KEEPIDLE/INTVL/CNT, so the pod's network-namespace
// sysctls apply) and M without, sends nothing, and reconnects a connection the kernel resets (a keepalive that
// went unanswered). Go's own keepalive defaults (15 s on every TCP socket) are switched off on both sides.
//
// classes opens one connection of each kind a per-connection report tells apart, and holds them idle:
// go-default (Go's runtime keepalive: SO_KEEPALIVE, TCP_KEEPIDLE 15 s, TCP_KEEPINTVL 15 s, TCP_KEEPCNT 9),
// own-idle-7200 (SO_KEEPALIVE and its own TCP_KEEPIDLE of 7200 s), sysctl (SO_KEEPALIVE only: the pod's sysctls
// apply), none (no SO_KEEPALIVE) and user-timeout (SO_KEEPALIVE and TCP_USER_TIMEOUT 30 s).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	log.SetFlags(log.LstdFlags | log.LUTC)
	if len(os.Args) < 2 {
		usage()
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	switch os.Args[1] {
	case "server":
		fs := flag.NewFlagSet("server", flag.ExitOnError)
		listen := fs.String("listen", ":7000", "address to listen on")
		_ = fs.Parse(os.Args[2:])
		server(ctx, *listen)
	case "client":
		fs := flag.NewFlagSet("client", flag.ExitOnError)
		peer := fs.String("peer", "", "server address HOST:PORT")
		ka := fs.Int("keepalive", 1, "connections with SO_KEEPALIVE")
		plain := fs.Int("plain", 1, "connections without SO_KEEPALIVE")
		_ = fs.Parse(os.Args[2:])
		if *peer == "" {
			usage()
		}
		client(ctx, *peer, *ka, *plain)
	case "classes":
		fs := flag.NewFlagSet("classes", flag.ExitOnError)
		peer := fs.String("peer", "", "server address HOST:PORT")
		_ = fs.Parse(os.Args[2:])
		if *peer == "" {
			usage()
		}
		classes(ctx, *peer)
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: keepalive-workload server [--listen :7000]\n"+
		"       keepalive-workload client --peer HOST:PORT [--keepalive N] [--plain M]\n"+
		"       keepalive-workload classes --peer HOST:PORT")
	os.Exit(2)
}

func server(ctx context.Context, addr string) {
	// KeepAlive < 0: Go does not turn SO_KEEPALIVE on for accepted connections.
	lc := net.ListenConfig{KeepAlive: -1}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		log.Fatalf("listen %s: %v", addr, err)
	}
	log.Printf("server listening on %s", ln.Addr())
	go func() { <-ctx.Done(); ln.Close() }()
	var open atomic.Int64
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Printf("accept: %v", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		n := open.Add(1)
		log.Printf("accepted %s (%d open)", c.RemoteAddr(), n)
		go func() {
			_, err := io.Copy(io.Discard, c)
			c.Close()
			log.Printf("closed %s: %v (%d open)", c.RemoteAddr(), err, open.Add(-1))
		}()
	}
}

func client(ctx context.Context, peer string, keepalive, plain int) {
	log.Printf("client: %d connections with SO_KEEPALIVE, %d without, to %s", keepalive, plain, peer)
	for i := 0; i < keepalive+plain; i++ {
		go hold(ctx, peer, i < keepalive)
	}
	<-ctx.Done()
}

// A socket option: level, option, value.
type option struct{ level, name, value int }

// classes holds one idle connection of each kind (see the package comment).
func classes(ctx context.Context, peer string) {
	const tcp = syscall.IPPROTO_TCP
	on := option{syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, 1}
	kinds := []struct {
		name      string
		keepalive time.Duration
		options   []option
	}{
		{"go-default", 0, nil},
		{"own-idle-7200", -1, []option{on, {tcp, syscall.TCP_KEEPIDLE, 7200}}},
		{"sysctl", -1, []option{on}},
		{"none", -1, nil},
		{"user-timeout", -1, []option{on, {tcp, 0x12 /* TCP_USER_TIMEOUT */, 30000}}},
	}
	for _, k := range kinds {
		go holdWith(ctx, peer, k.name, k.keepalive, k.options)
	}
	<-ctx.Done()
}

// hold keeps one idle connection open, reconnecting after an error.
func hold(ctx context.Context, peer string, keepalive bool) {
	v := 0
	kind := "plain"
	if keepalive {
		v, kind = 1, "keepalive"
	}
	holdWith(ctx, peer, kind, -1, []option{{syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, v}})
}

// holdWith keeps one idle connection open with Go's dialer keepalive setting `keepalive` (0: Go's default,
// negative: none of Go's) and `options` set on the socket before it connects, reconnecting after an error.
func holdWith(ctx context.Context, peer, kind string, keepalive time.Duration, options []option) {
	d := net.Dialer{
		KeepAlive: keepalive,
		Timeout:   10 * time.Second,
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				for _, o := range options {
					if serr == nil {
						serr = syscall.SetsockoptInt(int(fd), o.level, o.name, o.value)
					}
				}
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
	for ctx.Err() == nil {
		c, err := d.DialContext(ctx, "tcp", peer)
		if err != nil {
			log.Printf("%s: dial %s: %v", kind, peer, err)
			sleep(ctx, 2*time.Second)
			continue
		}
		log.Printf("%s: connected %s -> %s", kind, c.LocalAddr(), c.RemoteAddr())
		done := make(chan error, 1)
		go func() { _, err := io.Copy(io.Discard, c); done <- err }()
		select {
		case err = <-done:
			log.Printf("%s: connection %s lost: %v", kind, c.LocalAddr(), err)
		case <-ctx.Done():
		}
		c.Close()
		sleep(ctx, time.Second)
	}
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
