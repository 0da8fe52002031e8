// keepalive-workload: a tiny static test workload for hack/e2e.sh. It holds idle TCP connections so that the
// kernel's keepalive timers (and nothing else) decide what goes on the wire.
//
//	keepalive-workload server [--listen :7000]
//	keepalive-workload client --peer HOST:PORT [--keepalive N] [--plain M]
//
// The server accepts connections and never writes; its accepted sockets have no SO_KEEPALIVE. The client opens N
// connections with SO_KEEPALIVE on (and no per-socket TCP_KEEPIDLE/INTVL/CNT, so the pod's network-namespace
// sysctls apply) and M without, sends nothing, and reconnects a connection the kernel resets (a keepalive that
// went unanswered). Go's own keepalive defaults (15 s on every TCP socket) are switched off on both sides.
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
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: keepalive-workload server [--listen :7000]\n"+
		"       keepalive-workload client --peer HOST:PORT [--keepalive N] [--plain M]")
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

// hold keeps one idle connection open, reconnecting after an error.
func hold(ctx context.Context, peer string, keepalive bool) {
	d := net.Dialer{
		KeepAlive: -1, // no Go default keepalive
		Timeout:   10 * time.Second,
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			v := 0
			if keepalive {
				v = 1
			}
			err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, v)
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
	kind := "plain"
	if keepalive {
		kind = "keepalive"
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
